// The blip_fast op schemas, their shape-only (Meta) implementations, and the Python module `blip_fast._C`.
// CUDA implementations register themselves next to their kernels (TORCH_LIBRARY_IMPL in each .cu file).
// Importing blip_fast._C loads this library, which is what registers the ops under torch.ops.blip_fast.

#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

namespace {

at::Tensor decode_attention_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const std::optional<at::Tensor>& mask, double scale) {
  return at::empty(query.sizes(), query.options());
}

void decode_attention_out_meta(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const std::optional<at::Tensor>& mask, double scale, int64_t splits,
                               const at::Tensor& out) {}

}  // namespace

TORCH_LIBRARY(blip_fast, m) {
  // softmax(query @ key^T * scale + mask) @ value per image; query [C, H, M, Dh], key/value [C, H, N, Dh],
  // mask additive (or bool, True keeps) broadcastable to [C, 1, 1, N]. Returns [C, H, M, Dh] in the query's dtype.
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
  // The same into a caller's `out` (any strides, unit last one); splits > 0 forces the number of key splits
  // (tests), 0 = heuristic.
  m.def(
      "decode_attention_out(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale, int splits, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(blip_fast, Meta, m) {
  m.impl("decode_attention", &decode_attention_meta);
  m.impl("decode_attention_out", &decode_attention_out_meta);
}

// A module with no functions: loading its shared library is what registers the ops above. Plain CPython (not
// torch/extension.h's pybind11) keeps this file quick to compile.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "blip_fast._C", "blip_fast CUDA ops (torch.ops.blip_fast)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
