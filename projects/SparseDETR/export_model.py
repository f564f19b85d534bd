#!/usr/bin/env python
"""Export a SparseDETR model for deployment, in the manner of detectron2's tools/deploy/export_model.py.

The exported graph takes one image [3, H, W] (float pixels in INPUT.FORMAT, as the test resize made it; any H and
W) and returns what the model's post-processing returns: boxes [D, 4] (x0, y0, x1, y1 in the image's pixels,
clipped to it), scores [D] and classes [D]. Sparse DETR's kept-token count follows the image size inside the
graph, at MODEL.SPARSE_DETR.TEST_RHO (else RHO).

Examples:
  # ONNX for onnxruntime (deformable attention as GridSample), checked against PyTorch
  python projects/SparseDETR/export_model.py --config-file configs/r50/sparse_detr_rho_0.1.yaml --format onnx \\
      --output out/ --sample-image photo.jpg --verify MODEL.WEIGHTS model.pth MODEL.DEVICE cpu
  # ONNX for TensorRT (MultiscaleDeformableAttnPlugin_TRT nodes)
  python projects/SparseDETR/export_model.py --config-file configs/r50/sparse_detr_rho_0.1.yaml --format onnx \\
      --trt-plugin --output out/ MODEL.WEIGHTS model.pth MODEL.DEVICE cpu
  # torch.export ExportedProgram (.pt2), keeping the compiled op; aoti: AOTInductor package
  python projects/SparseDETR/export_model.py --config-file configs/r50/sparse_detr_rho_0.1.yaml \\
      --format torch_export --output out/ MODEL.WEIGHTS model.pth MODEL.DEVICE cpu
"""

from sparse_detr.export.tool import main

if __name__ == "__main__":
    main()
