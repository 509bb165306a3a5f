// shape_str: see include/qlora/shape_str.h.
#include "qlora/shape_str.h"

namespace qlora {

std::string shape_str(c10::ArrayRef<int64_t> shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace qlora
