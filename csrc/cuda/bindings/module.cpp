// `import trainops._C_cuda` loads this shared object, which registers the CUDA kernels of
// the trainops operators (the other files of this directory) with the dispatcher.
#include <Python.h>

static PyModuleDef trainops_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", "trainops CUDA kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&trainops_cuda_module); }
