// The native library is loaded as the Python module salun_ext._C. It exposes no Python functions: the kernels
// register themselves with the PyTorch dispatcher (TORCH_LIBRARY_IMPL blocks in cpu/ and cuda/) when the shared
// object is loaded, and the schemas live in salun_ext/_ops.py.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // doc
      -1,       // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
