// The AVX512 path of csrc/cpu/scale_cpu.cpp (see csrc/cpu/isa.h); empty where that path is not built.
#define FASTGRAD_ISA_AVX512 1
#include "../scale_cpu.cpp"
