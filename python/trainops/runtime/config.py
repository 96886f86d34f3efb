"""Configuration of ``trainops train``: one flat dataclass, every field documented.

The ``--help`` text, the YAML keys and the ``--key value`` command-line overrides are all
generated from :class:`TrainConfig`'s fields (``metadata["help"]``), so they cannot drift
apart. :func:`load_config` merges defaults < YAML file < command line and validates.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar

from trainops._validation import is_int

__all__ = ["TrainConfig", "ConfigError", "load_config", "config_from_dict", "preflight", "DOMAIN_NAMES",
           "RESUME_KEYS", "MAX_SIZES", "MAX_TOKENS"]

DOMAIN_NAMES = ("arith", "reverse", "sort", "grammar", "add")
LBL_SCOPES = ("micro_batch", "sequence", "global")
REPLAY_MODES = ("off", "power_law", "reservoir")
ADAPTERS = ("mora", "lora", "none")
SYNC_MODES = ("diloco", "ddp")


class ConfigError(ValueError):
    """A bad configuration: unknown key, invalid value, or a checkpoint from another config."""


# Upper bounds of the sizes: a typo such as ``--seq-len 1200000`` fails at once with the key
# named, not as an out-of-memory error or a hang inside the workers. Generous for the small
# models this runtime trains.
MAX_SIZES = {"workers": 256, "threads": 256, "seq_len": 4096, "batch_size": 8192, "eval_size": 65536,
             "d_model": 8192, "n_layers": 128, "n_heads": 256, "num_experts": 1024, "top_k": 1024,
             "ffn_size": 65536, "grad_accum": 4096, "adapter_rank": 1024, "mora_top_k": 65536,
             "replay_capacity": 1_000_000, "sync_every": 1_000_000, "overlap_steps": 1_000_000, "fragments": 1024, "block_size": 65536,
             "pretrain_steps": 10**9, "task_steps": 10**9, "checkpoint_every": 10**9, "stop_after": 10**12, "log_every": 10**9,
             "min_numel": 2**40}
# Tokens (rows x seq_len) of one micro-batch, of the held-out set of one domain and of the
# replay buffer of one worker.
MAX_TOKENS = {"batch_size": 1 << 20, "eval_size": 1 << 22, "replay_capacity": 1 << 26}
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    COMMAND: ClassVar[str] = "train"  # the `trainops <command>` these options belong to (errors name it)

    # --- run ---------------------------------------------------------------------------
    out_dir: str = _f("runs/default", "output directory (metrics.jsonl, config.yaml, report.md, plots/, checkpoint/)")
    seed: int = _f(0, "seed of model init, data and replay sampling")
    workers: int = _f(2, "worker processes spawned on this machine (ignored under torchrun)")
    device: str = _f("auto", "auto | cpu | cuda (auto: cuda with NCCL when available)")
    threads: int = _f(1, "torch threads per worker")
    timeout_s: float = _f(120.0, "seconds a collective waits before a dead worker is reported")
    progress: bool = _f(True, "show a tqdm bar per phase on rank 0 (--no-progress: log lines, see --log-every)")
    log_every: int = _f(50, "with --no-progress: rank 0 writes a line to stderr (step, loss, tokens/s) every N steps "
                            "of a phase, at its last step and after its evaluation (0: none)")
    tensorboard: bool = _f(False, "rank 0 also writes the scalars of metrics.jsonl as TensorBoard events to "
                                  "out_dir/tensorboard (needs pip install 'trainops[tensorboard]')")
    # --- data --------------------------------------------------------------------------
    tasks: str = _f("arith,reverse,sort,grammar",
                    "comma-separated embedded domains learned in sequence (arith, reverse, sort, grammar) "
                    "or text files / globs, one domain per file: lines 'prompt<TAB>answer'")
    seq_len: int = _f(12, "tokens per sequence (byte-level; prompt + answer + padding)")
    batch_size: int = _f(32, "sequences per micro-batch per worker")
    eval_size: int = _f(256, "held-out sequences per domain for accuracy and routing statistics")
    # --- model -------------------------------------------------------------------------
    d_model: int = _f(64, "transformer width")
    n_layers: int = _f(2, "transformer blocks (attention + MoE)")
    n_heads: int = _f(4, "attention heads")
    num_experts: int = _f(4, "experts per MoE layer")
    top_k: int = _f(2, "experts per token")
    ffn_size: int = _f(96, "hidden size of each expert MLP")
    lbl_coeff: float = _f(0.02, "load-balancing loss weight (0 disables it)")
    lbl_scope: str = _f("global", "LBL scope: micro_batch | sequence | global (global-batch balance)")
    # --- pre-training ------------------------------------------------------------------
    pretrain_steps: int = _f(100, "optimizer steps on the mixture of all task domains before the task sequence")
    grad_accum: int = _f(4, "micro-batches per optimizer step; each micro-batch holds one domain")
    lr: float = _f(3e-3, "pre-training AdamW learning rate")
    # --- continual tasks ---------------------------------------------------------------
    task_steps: int = _f(300, "optimizer steps per task")
    task_lr: float = _f(5e-3, "AdamW learning rate while learning tasks")
    adapter: str = _f("mora", "mora (add_task per task) | lora (one LoRA adapter for all tasks) | none (full fine-tune)")
    adapter_rank: int = _f(4, "ranks added per task (mora) or lora rank per task x tasks (lora)")
    adapter_targets: str = _f("q|k|v|o|head", "regex over module leaf names that get adapters")
    mora_top_k: int = _f(16, "MoRA ranks kept per token (16: every rank of the 4 default tasks)")
    mora_temperature: float = _f(0.1, "MoRA gate softmax temperature")
    replay: str = _f("power_law", "rehearsal: off | power_law (power-law recency per task) | reservoir")
    replay_ratio: float = _f(0.25, "fraction of each task batch drawn from the replay buffer")
    replay_capacity: int = _f(2048, "replay buffer rows per worker")
    # --- distributed -------------------------------------------------------------------
    sync: str = _f("diloco", "how workers are kept in agreement: diloco (the DiLoCo / Streaming DiLoCo keys below) | "
                             "ddp (DistributedDataParallel: gradients averaged every optimizer step, see --ddp-hook)")
    ddp_hook: str = _f("fp32", "with --sync ddp: gradient all-reduce format, fp32 (plain all-reduce) or a "
                               "trainops.formats name (int8, fp4_e3m0, ...) through trainops' quantized_comm_hook")
    exchange: str = _f("fp4_e3m0", "DiLoCo pseudo-gradient format: fp32 or a trainops.formats name (fp4_e3m0, ...)")
    sync_every: int = _f(10, "DiLoCo H: inner steps between syncs of a fragment")
    fragments: int = _f(1, "Streaming DiLoCo fragments")
    overlap_steps: int = _f(0, "Streaming DiLoCo tau: inner steps a fragment's exchange runs in the background "
                               "before its outer step is applied (0: wait for it; must be < sync_every)")
    outer_lr: float = _f(1.0, "DiLoCo outer SGD learning rate")
    outer_momentum: float = _f(0.5, "DiLoCo outer Nesterov momentum (0: plain SGD; the paper's 0.9 is tuned for H in the hundreds and slows this short-H run down)")
    error_feedback: bool = _f(True, "carry each fragment's quantization residual to the next sync")
    block_size: int = _f(64, "quantization block size")
    min_numel: int = _f(256, "fragments smaller than this are exchanged in fp32")
    # --- checkpoints -------------------------------------------------------------------
    checkpoint_every: int = _f(50, "save a checkpoint every N optimizer steps (0: only at the end / on signal)")
    resume: bool = _f(False, "continue from out_dir/checkpoint (the config must match the saved one)")
    overwrite: bool = _f(False, "start over in an out_dir that holds a previous run (deletes its checkpoint and "
                                "metrics); without it such an out_dir is refused")
    stop_after: int = _f(0, "testing aid: checkpoint and stop after this many steps in total (0: off)")

    def validate(self) -> "TrainConfig":
        def need(cond, key, what):
            if not cond:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {what}")
        for f in dataclasses.fields(self):  # inf / nan pass "> 0" and fail inside the workers
            if f.type in (float, "float"):
                need(math.isfinite(getattr(self, f.name)), f.name, "must be a finite number")
        need(bool(self.out_dir.strip()), "out_dir", "must not be empty")
        for key in ("workers", "threads", "seq_len", "batch_size", "eval_size", "d_model", "n_layers", "n_heads",
                    "num_experts", "top_k", "ffn_size", "grad_accum", "task_steps", "adapter_rank", "mora_top_k",
                    "replay_capacity", "sync_every", "fragments", "block_size"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("pretrain_steps", "checkpoint_every", "stop_after", "min_numel", "lbl_coeff", "log_every"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        for key, most in MAX_SIZES.items():
            need(getattr(self, key) <= most, key, f"must be <= {most}")
        for key, most in MAX_TOKENS.items():
            need(getattr(self, key) * self.seq_len <= most, key,
                 f"x seq_len={self.seq_len} must be <= {most} tokens")
        for key in ("lr", "task_lr", "outer_lr", "mora_temperature", "timeout_s"):
            need(getattr(self, key) > 0, key, "must be > 0")
        need(self.timeout_s <= MAX_TIMEOUT_S, "timeout_s", f"must be <= {MAX_TIMEOUT_S:.0f} (7 days)")
        need(not (self.resume and self.overwrite), "overwrite", "contradicts --resume; give one of them")
        try:
            re.compile(self.adapter_targets)
        except re.error as e:
            raise ConfigError(f"adapter_targets={self.adapter_targets!r}: not a valid regular expression ({e})") \
                from None
        need(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        need(self.d_model % self.n_heads == 0, "d_model", f"must be divisible by n_heads={self.n_heads}")
        need(self.top_k <= self.num_experts, "top_k", f"must be <= num_experts={self.num_experts}")
        need(self.lbl_scope in LBL_SCOPES, "lbl_scope", f"must be one of {', '.join(LBL_SCOPES)}")
        need(self.replay in REPLAY_MODES, "replay", f"must be one of {', '.join(REPLAY_MODES)}")
        need(self.adapter in ADAPTERS, "adapter", f"must be one of {', '.join(ADAPTERS)}")
        need(0.0 <= self.replay_ratio < 1.0, "replay_ratio", "must be in [0, 1)")
        need(0.0 <= self.outer_momentum < 1.0, "outer_momentum", "must be in [0, 1)")
        need(self.sync in SYNC_MODES, "sync", f"must be one of {', '.join(SYNC_MODES)}")
        need(self.overlap_steps >= 0, "overlap_steps", "must be >= 0")
        if self.sync == "diloco":  # the DiLoCo schedule; DDP syncs every step
            need(self.sync_every % self.fragments == 0, "sync_every",
                 f"must be divisible by fragments={self.fragments}")
            need(self.task_steps % self.sync_every == 0 and self.pretrain_steps % self.sync_every == 0, "sync_every",
                 f"must divide pretrain_steps={self.pretrain_steps} and task_steps={self.task_steps} "
                 "(every phase ends on a sync)")
            need(self.overlap_steps < self.sync_every, "overlap_steps", f"must be < sync_every={self.sync_every}")
        for key in ("ddp_hook", "exchange"):  # both take fp32 or a quantization format at block_size
            if getattr(self, key) != "fp32":
                from trainops.formats import check_block_size, get_format
                try:
                    get_format(getattr(self, key))
                    check_block_size(self.block_size)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{key}={getattr(self, key)!r} / block_size={self.block_size}: {e}") from None
        names = self.task_list()
        need(len(names) >= 1, "tasks", "must name at least one domain")
        need(len(set(names)) == len(names), "tasks", "names a domain twice")
        for n in names:
            if n not in DOMAIN_NAMES and not any(c in n for c in "/.*"):
                raise ConfigError(f"tasks: unknown domain {n!r}; embedded domains are {', '.join(DOMAIN_NAMES)} "
                                  "(or give a text file path / glob)")
        from trainops.runtime.domains import make_domains
        try:  # builds each domain and samples from it: a seq_len too short for a domain fails here
            make_domains(names, self.seq_len)
        except ValueError as e:
            if "needs seq_len" in str(e):
                raise ConfigError(f"seq_len={self.seq_len}: {e}") from None
            raise ConfigError(str(e) if str(e).startswith("tasks:") else f"tasks: {e}") from None
        except OSError as e:
            raise ConfigError(f"tasks: cannot read {e.filename}: {e.strerror}") from None
        return self

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys that may differ between a checkpoint and the run that resumes it.
RESUME_KEYS = ("resume", "overwrite", "progress", "timeout_s", "stop_after", "checkpoint_every", "out_dir",
               "log_every", "tensorboard")


def preflight(cfg: TrainConfig, under_torchrun: bool = False) -> None:
    """Checks of a valid config against this machine and the model, run by the launcher
    before any worker starts: CUDA present for ``--device cuda``, workers that fit the
    machine, the tensorboard package for ``--tensorboard``, ``adapter_targets`` that match
    a layer of the model."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': CUDA is not available here (torch "
                          f"{torch.__version__}{'' if torch.version.cuda else ', built without CUDA'}); "
                          "use --device cpu or --device auto")
    if not under_torchrun:
        on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if on_gpu and cfg.workers > torch.cuda.device_count():
            raise ConfigError(f"workers={cfg.workers}: must be <= the {torch.cuda.device_count()} visible GPU(s) "
                              "(one NCCL worker per GPU)")
        cpus = os.cpu_count() or 1
        if not on_gpu and cfg.workers * cfg.threads > 4 * cpus:
            raise ConfigError(f"workers={cfg.workers}: workers x threads ({cfg.workers * cfg.threads}) must be <= "
                              f"4 x the {cpus} CPUs here")
    if cfg.tensorboard:
        from trainops.runtime.monitor import require_tensorboard
        require_tensorboard()
    if cfg.adapter != "none":
        from trainops.runtime.domains import VOCAB
        from trainops.runtime.model import MoETransformer, _target_regex
        with torch.device("meta"):
            model = MoETransformer(cfg, VOCAB)
        pattern = re.compile(_target_regex(cfg.adapter_targets))
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if not any(pattern.fullmatch(n) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(f"adapter_targets={cfg.adapter_targets!r}: matches no layer of the model "
                              f"(layer names: {', '.join(leaves)})")


def _coerce(f: dataclasses.Field, value, source: str):
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str, "bool": bool}[f.type]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
    elif typ is int:
        if is_int(value):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, float) or is_int(value):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, float)) or is_int(value):
            return str(value)
    raise ConfigError(f"{source}: {f.name} must be {typ.__name__}, got {value!r}")


def config_from_dict(values: dict, source: str = "config", cls: type = TrainConfig) -> TrainConfig:
    """A validated ``cls`` (TrainConfig or a subclass such as the RL config) from key: value pairs."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = [n for n in fields if n.startswith(name[:4])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; see `trainops {cls.COMMAND} --help`")
        kwargs[name] = _coerce(fields[name], value, source)
    return cls(**kwargs).validate()


def help_text(cls: type = TrainConfig) -> str:
    lines = []
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        most = f", at most {MAX_SIZES[f.name]}" if f.name in MAX_SIZES else ""
        lines.append(f"  {flag} {typ.upper():5s} {f.metadata['help']} (default: {f.default!r}{most})")
    lines.append("\nFloats must be finite. Rows x seq_len at most: "
                 + ", ".join(f"{k} {v}" for k, v in MAX_TOKENS.items()) + " tokens.")
    return "\n".join(lines)


def parse_overrides(argv: list[str], cls: type = TrainConfig) -> tuple[str | None, dict]:
    """``[--config FILE] [--key value | --flag | --no-flag ...]`` -> (config path, overrides)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    path, out, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options are --key value (see --help)")
        key, eq, val = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name == "config":
            if not eq:
                i += 1
                if i >= len(argv):
                    raise ConfigError("--config needs a file path")
                val = argv[i]
            path = val
        elif not eq and name.startswith("no_") and name[3:] in fields and fields[name[3:]].type in (bool, "bool"):
            out[name[3:]] = False
        elif not eq and name in fields and fields[name].type in (bool, "bool") and (
                i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            out[name] = True
        else:
            if name not in fields:
                raise ConfigError(f"unknown option --{key}; see `trainops {cls.COMMAND} --help`")
            if not eq:
                i += 1
                if i >= len(argv):
                    raise ConfigError(f"--{key} needs a value")
                val = argv[i]
            out[name] = val
        i += 1
    return path, out


def load_config(argv: list[str], cls: type = TrainConfig) -> TrainConfig:
    """Defaults < ``--config`` YAML file < ``--key value`` overrides; validated."""
    path, overrides = parse_overrides(argv, cls)
    values: dict = {}
    if path is not None:
        import yaml
        try:
            with open(path) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ConfigError(f"--config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--config {path}: YAML syntax error{where}: {problem}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path}: not a text (UTF-8) file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: must be a mapping of key: value")
        values.update(loaded)
        fields = {f.name for f in dataclasses.fields(cls)}
        for k in loaded:
            if str(k).replace("-", "_") not in fields:
                raise ConfigError(f"{path}: unknown key {k!r}; see `trainops {cls.COMMAND} --help`")
    values.update(overrides)
    return config_from_dict(values, source=path or "command line", cls=cls)
