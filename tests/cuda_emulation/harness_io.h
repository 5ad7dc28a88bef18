// What the emulation harnesses share: their parameters (`params.txt` in the run's folder, one
// "key value" line each) and their tensors (float64, raw `NAME.bin` files in that folder; an
// absent file is an absent tensor).
#pragma once

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

}  // namespace harness
