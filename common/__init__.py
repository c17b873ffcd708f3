"""Plumbing shared by the method scripts: data, distributed, optimisation, kNN, checkpoints,
logging. Scripts import names from here explicitly (`from common import LARS, ...`)."""
from common.args import (add_common_args, check_batch, format_args, recipe_values, resolve_recipe,
                         save_args)
from common.checkpoint import (StopSignal, export_backbone, keep_epoch_copy, load_checkpoint,
                               requeue_slurm_job, resume, rng_state, save_checkpoint,
                               seed_everything, set_rng_state)
from common.augment import (IMAGENET_MEAN, IMAGENET_STD, ViewPipeline, ViewRecipe, multi_crop,
                            ssl_view)
from common.data import (build_dataset, count_bad_images, eval_transform, labelled_subset,
                         linear_train_transform, make_loader)
from common.dist import (all_gather_tensor, all_reduce_with_grad, broadcast_flag, broadcast_object,
                         cleanup_distributed, gather_with_grad, get_rank, get_world_size,
                         setup_distributed)
from common.knn import capped, extract_features, knn_accuracy, knn_monitor, knn_predict
from common.log import Logger, Progress, UserError, exit_on_user_error
from common.loop import end_epoch, save_or_stop, stop_agreed, stop_and_requeue
from common.model import (autocast, distribute, features_by_resolution, grad_scaler, infer_arch,
                          resnet_backbone, resolve_precision, unwrap)
from common.probe import OnlineProbe, online_probe
from common.optim import (LARS, build_optimizer, describe_optimizer, param_groups, set_lr,
                          warmup_cosine)
