"""Plumbing shared by the method scripts, a small module per concern, each saying in its first
lines what it holds and, if it is not always loaded, when it is (docs/README.md, "Project
layout", lists them). Scripts import each name from its module, so the import line says where
a name lives. A method script loads run, args, checkpoint, data, augment, model, optim, dist,
knn, log and errors; the others load only when a flag, a dataset or an event asks for them."""
