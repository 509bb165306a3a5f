// How error messages and logs write a tensor shape: "[4096, 14336]".
#pragma once
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace qlora {

std::string shape_str(c10::ArrayRef<int64_t> shape);

}  // namespace qlora
