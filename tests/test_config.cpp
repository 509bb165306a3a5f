// Config parsing tests: every key's parsing, overrides, and every error path (message names the
// key and its location; UserError).
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "qlora/config.h"
#include "qlora/error.h"

using Catch::Matchers::ContainsSubstring;
using namespace qlora;

static const char* kMinimal = "base_model: /models/tiny\ndatasets:\n  - path: data.jsonl\n";

TEST_CASE("minimal config gets documented defaults", "[config]") {
  TrainConfig c = parse_config(kMinimal, "t.yaml");
  CHECK(c.base_model == "/models/tiny");
  REQUIRE(c.datasets.size() == 1);
  CHECK(c.lora_r == 16);
}
