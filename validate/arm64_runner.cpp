// mlexport arm64 logits runner: runs a .pte's `forward` over a schedule of calls and writes every call's logits.
//
// Built by `mlexport setup qemu-arm64` against PyPI's aarch64 executorch wheel and run under qemu-user, so the
// logits come from the arm64 (NEON) XNNPACK and portable kernels. The host runs the same schedule through
// ExecuTorch's Python runtime and compares.
//
// usage: runner MODEL.pte DATA.ptd|- SCHEDULE.bin LOGITS.bin
//   SCHEDULE.bin: int64 little-endian: n_calls, then per call: start, length, length token ids
//   LOGITS.bin:   per call: int64 rows, int64 columns, rows*columns float32
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

static bool read_i64(std::ifstream& in, int64_t& value) {
  return static_cast<bool>(in.read(reinterpret_cast<char*>(&value), sizeof(value)));
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s MODEL.pte DATA.ptd|- SCHEDULE.bin LOGITS.bin\n", argv[0]);
    return 2;
  }
  const std::string data = argv[2];
  std::unique_ptr<Module> module = data == "-" ? std::make_unique<Module>(argv[1], Module::LoadMode::Mmap)
                                               : std::make_unique<Module>(argv[1], data, Module::LoadMode::Mmap);
  if (module->load_method("forward") != Error::Ok) {
    std::fprintf(stderr, "error: could not load method forward of %s\n", argv[1]);
    return 1;
  }
  std::ifstream schedule(argv[3], std::ios::binary);
  std::ofstream out(argv[4], std::ios::binary);
  int64_t calls = 0;
  if (!schedule || !out || !read_i64(schedule, calls)) {
    std::fprintf(stderr, "error: cannot read %s or write %s\n", argv[3], argv[4]);
    return 1;
  }
  for (int64_t call = 0; call < calls; ++call) {
    int64_t start = 0, length = 0;
    if (!read_i64(schedule, start) || !read_i64(schedule, length) || length <= 0) {
      std::fprintf(stderr, "error: schedule truncated at call %lld\n", static_cast<long long>(call));
      return 1;
    }
    std::vector<int64_t> tokens(static_cast<size_t>(length));
    for (auto& token : tokens) {
      if (!read_i64(schedule, token)) {
        std::fprintf(stderr, "error: schedule truncated in call %lld\n", static_cast<long long>(call));
        return 1;
      }
    }
    auto token_tensor = from_blob(tokens.data(), {1, static_cast<int>(length)}, ScalarType::Long);
    auto position = from_blob(&start, {1}, ScalarType::Long);
    auto result = module->forward({EValue(token_tensor), EValue(position)});
    if (!result.ok()) {
      std::fprintf(stderr, "error: forward failed at call %lld (error %d)\n", static_cast<long long>(call),
                   static_cast<int>(result.error()));
      return 1;
    }
    const auto& logits = result.get()[0].toTensor();
    const int64_t columns = logits.size(logits.dim() - 1);
    const int64_t rows = logits.numel() / columns;
    out.write(reinterpret_cast<const char*>(&rows), sizeof(rows));
    out.write(reinterpret_cast<const char*>(&columns), sizeof(columns));
    out.write(reinterpret_cast<const char*>(logits.const_data_ptr<float>()),
              static_cast<std::streamsize>(rows * columns * sizeof(float)));
  }
  return out.good() ? 0 : 1;
}
