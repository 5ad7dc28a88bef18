// What the emulation harnesses share: their parameters (`params.txt` in the run's folder, one
// "key value" line each), their tensors (float64, raw `NAME.bin` files in that folder; an
// absent file is an absent tensor), and device-memory stand-ins that can be misaligned on request.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace harness {

inline std::map<std::string, long long> cfg;
inline std::string dir;

// Reads `DIR/params.txt` into `cfg`.
inline void read_params(const char* folder) {
    dir = folder;
    std::ifstream f(dir + "/params.txt");
    std::string key;
    long long value;
    while (f >> key >> value) cfg[key] = value;
}

inline long long get(const char* key) {
    auto it = cfg.find(key);
    if (it == cfg.end()) throw std::runtime_error(std::string("missing parameter ") + key);
    return it->second;
}

// An optional parameter: `fallback` when absent.
inline long long get_or(const std::string& key, long long fallback) {
    auto it = cfg.find(key);
    return it == cfg.end() ? fallback : it->second;
}

inline std::vector<double> load(const char* name) {
    std::ifstream f(dir + "/" + name + ".bin", std::ios::binary | std::ios::ate);
    if (!f) return {};
    const auto bytes = (size_t)f.tellg();
    std::vector<double> v(bytes / sizeof(double));
    f.seekg(0);
    f.read(reinterpret_cast<char*>(v.data()), (std::streamsize)bytes);
    return v;
}

inline void save(const char* name, const std::vector<double>& v) {
    std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
    f.write(reinterpret_cast<const char*>(v.data()), (std::streamsize)(v.size() * sizeof(double)));
}

inline double* ptr(std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }

// Device memory stand-in: `n` doubles whose first one sits on a 64-byte boundary, or one element
// past it when the run asks to misalign `name` (so vector accesses must fall back).
struct Buffer {
    std::vector<double> storage;
    double* data = nullptr;
    size_t n = 0;

    Buffer(const char* name, size_t count) : storage(count + 16), n(count) {
        const auto address = reinterpret_cast<std::uintptr_t>(storage.data());
        const size_t skip = ((64 - address % 64) % 64) / sizeof(double);
        data = storage.data() + skip + (get_or(std::string("misalign_") + name, 0) ? 1 : 0);
    }
    std::vector<double> values() const { return std::vector<double>(data, data + n); }
};

// A tensor read from NAME.bin (null when the file is absent), in a Buffer.
struct Input {
    std::vector<double> values;
    Buffer buffer;
    explicit Input(const char* name) : values(load(name)), buffer(name, values.size()) {
        std::copy(values.begin(), values.end(), buffer.data);
    }
    double* ptr() const { return values.empty() ? nullptr : buffer.data; }
    bool present() const { return !values.empty(); }
};

}  // namespace harness
