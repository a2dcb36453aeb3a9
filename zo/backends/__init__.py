"""The fast sweeps: C kernels for the CPU (cpu.py) and Triton kernels for CUDA (triton.py), both emitted from a method's
rule.  Imported on first use by zo.sweeps; they know no optimizer."""
