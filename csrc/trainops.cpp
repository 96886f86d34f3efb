// The Python module trainops._C: loading it registers the C++ kernels of the trainops
// operators with the dispatcher (the TORCH_LIBRARY_IMPL blocks of csrc/cpu/*.cpp). The
// schemas are declared in Python, python/trainops/ops/_schemas.py, which trainops imports
// before it loads this extension.
#include <Python.h>

static PyModuleDef trainops_module = {PyModuleDef_HEAD_INIT, "_C", "trainops operator kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&trainops_module); }
