"""Plumbing shared by the method scripts. Scripts import each name from its module, so the import
line says where a name lives:

    args        the flags every script shares, recipes (ImageNet / small images), args.json
    log         Logger (log.jsonl, stdout), Progress (tqdm or plain lines), UserError
    track       TensorBoard events and Weights & Biases beside log.jsonl (optional), their flags
    data        datasets (ImageFolder, CIFAR, STL-10, synthetic), loaders, bad-image handling
    augment     the view recipes (crops, colour, blur, solarize) and the fast CPU pipeline
    gpu_aug     batched colour/blur/solarize and --data-on-device views on the GPU
    model       backbones (ResNet, ResNeXt, ViT), precision (autocast, grad scaler), DDP wrapping, SyncBN
    optim       LARS, parameter groups, build_optimizer, warmup + cosine
    dist        process groups, all_gather with gradients, broadcast helpers
    probe       the online linear probe (--probe)
    knn         feature extraction, weighted kNN, the per-epoch kNN monitor
    checkpoint  save / resume (what a resume may change) / export backbone.pt, RNG state, Slurm requeue
    loop        the end of an epoch (log, checkpoint, kNN), stopping on a signal, the divergence guard
    weights     reading backbones from cleanssl and official checkpoints
"""
