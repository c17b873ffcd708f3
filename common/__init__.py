"""Plumbing shared by the method scripts. Scripts import each name from its module, so the import
line says where a name lives. What every script loads:

    run         the run around a method's step (resume, log, checkpoints, stopping): `Run`
    args        the flags every script shares, recipes (ImageNet / small images), args.json
    checkpoint  atomic save, what a resume may change, backbone.pt, RNG state
    data        datasets (ImageFolder, CIFAR, STL-10, synthetic), seeded resumable loaders
    augment     the view recipes (crops, colour, blur, solarize) and the fast CPU pipeline
    model       backbones (ResNet, ResNeXt; ViT via vit), precision, DDP wrapping, SyncBN
    optim       LARS, parameter groups, build_optimizer, warmup + cosine
    dist        process groups, all_gather with gradients, broadcast helpers
    knn         feature extraction, weighted kNN, the per-epoch kNN monitor
    log         log.jsonl and printed lines, progress bars
    errors      one-line errors (UserError, Diverged), optional packages

Loaded only when asked for: vit (--arch vit_*), gpu_aug (--gpu-aug, --data-on-device), probe
(--probe), track (TensorBoard, W&B), slurm (under Slurm); and by linear_eval.py alone:
evaluation (labelled subsets, linear heads, DINO's ViT features) and weights (official layouts).
"""
