// Per-sample seeds of a batch: derive_seeds(head, count)[k] = the first 8 bytes (little-endian) of
// BLAKE2b-64(head + "<k>)"), masked to 63 bits -- the values of spacedkd_fast.data.pipeline.derive_seed, computed
// without a Python call per seed. BLAKE2b as specified in RFC 7693 (unkeyed, digest length 8).
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "seeds.h"

namespace spacedkd {
namespace {

constexpr uint64_t kIV[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                             0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                             0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

constexpr uint8_t kSigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

constexpr size_t kBlock = 128;

inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

inline uint64_t load_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The compression function F of RFC 7693 section 3.2 on one 128-byte block.
void compress(uint64_t h[8], const uint8_t block[kBlock], uint64_t bytes_so_far, bool last) {
  uint64_t m[16];
  for (int i = 0; i < 16; ++i) m[i] = load_le64(block + 8 * i);
  uint64_t v[16];
  for (int i = 0; i < 8; ++i) {
    v[i] = h[i];
    v[i + 8] = kIV[i];
  }
  v[12] ^= bytes_so_far;  // the counter's high word stays 0: messages here are far below 2^64 bytes
  if (last) v[14] = ~v[14];
  auto g = [&v](int a, int b, int c, int d, uint64_t x, uint64_t y) {
    v[a] = v[a] + v[b] + x;
    v[d] = rotr(v[d] ^ v[a], 32);
    v[c] = v[c] + v[d];
    v[b] = rotr(v[b] ^ v[c], 24);
    v[a] = v[a] + v[b] + y;
    v[d] = rotr(v[d] ^ v[a], 16);
    v[c] = v[c] + v[d];
    v[b] = rotr(v[b] ^ v[c], 63);
  };
  for (const auto& s : kSigma) {
    g(0, 4, 8, 12, m[s[0]], m[s[1]]);
    g(1, 5, 9, 13, m[s[2]], m[s[3]]);
    g(2, 6, 10, 14, m[s[4]], m[s[5]]);
    g(3, 7, 11, 15, m[s[6]], m[s[7]]);
    g(0, 5, 10, 15, m[s[8]], m[s[9]]);
    g(1, 6, 11, 12, m[s[10]], m[s[11]]);
    g(2, 7, 8, 13, m[s[12]], m[s[13]]);
    g(3, 4, 9, 14, m[s[14]], m[s[15]]);
  }
  for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
}

// The first 8 digest bytes, as a little-endian integer, of BLAKE2b with an 8-byte digest over `message`.
uint64_t blake2b_64(const uint8_t* message, size_t length) {
  uint64_t h[8];
  std::memcpy(h, kIV, sizeof(h));
  h[0] ^= 0x01010000ULL ^ 8ULL;  // parameter block: depth 1, fanout 1, no key, digest length 8
  size_t done = 0;
  while (length - done > kBlock) {  // every block but the last (which may be full) is not final
    compress(h, message + done, done + kBlock, false);
    done += kBlock;
  }
  uint8_t last[kBlock] = {0};
  std::memcpy(last, message + done, length - done);
  compress(h, last, length, true);
  return h[0];
}

}  // namespace

std::vector<int64_t> derive_seeds(const std::string& head, int64_t count) {
  TORCH_CHECK(count >= 0, "spacedkd_fast._C.derive_seeds: count must be >= 0, got ", count);
  std::vector<int64_t> seeds(static_cast<size_t>(count));
  std::string message = head;
  const size_t head_length = head.size();
  for (int64_t k = 0; k < count; ++k) {
    message.resize(head_length);
    message += std::to_string(k);
    message += ')';
    const uint64_t digest = blake2b_64(reinterpret_cast<const uint8_t*>(message.data()), message.size());
    seeds[static_cast<size_t>(k)] = static_cast<int64_t>(digest & 0x7fffffffffffffffULL);
  }
  return seeds;
}

}  // namespace spacedkd
