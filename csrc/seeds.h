// Per-sample seed derivation (csrc/seeds.cpp): the engine's sample seeds without a Python call per seed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace spacedkd {

// seeds[k] = BLAKE2b-64(head + std::to_string(k) + ")") read little-endian, masked to 63 bits: for the text
// head = "(p0, p1, ..., " of a seed prefix, the values of spacedkd_fast.data.pipeline.derive_seed(*prefix, k).
std::vector<int64_t> derive_seeds(const std::string& head, int64_t count);

}  // namespace spacedkd
