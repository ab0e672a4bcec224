// The AVX512 path of csrc/cpu/grad_stats_cpu.cpp (see csrc/cpu/isa.h); empty where that path is not built.
#define FASTGRAD_ISA_AVX512 1
#include "../grad_stats_cpu.cpp"
