// Placeholder translation unit; the fused kernels are added by the ops work.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "noencore C++ CPU kernels"; }
