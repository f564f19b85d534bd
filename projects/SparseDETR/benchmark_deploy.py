#!/usr/bin/env python
"""Inference paths of one model in one run: PyTorch eager (plain, fast), torch.compile, the torch.export program,
onnxruntime (and AOTInductor with --paths ... aoti), with the peak memory of a forward. See
sparse_detr/export/benchmark.py for what each path runs.

Examples:
  python projects/SparseDETR/benchmark_deploy.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
      --threads 2 MODEL.DEVICE cpu
  python projects/SparseDETR/benchmark_deploy.py --config-file configs/r50/deformable_detr_bbr_two_stage.yaml \\
      --paths eager-plain eager-fast onnxruntime --threads 2 MODEL.DEVICE cpu
"""

from sparse_detr.export.benchmark import main

if __name__ == "__main__":
    main()
