"""Vision Transformers (ViT-Ti/S/B) from torchvision's VisionTransformer, with DINO's and MoCo v3's
initialisations; imported only when --arch names a ViT (common/model.py `build_backbone`)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vision_transformer import VisionTransformer

from common.errors import UserError


class VisionTransformerBackbone(VisionTransformer):
    """torchvision's VisionTransformer with no classifier (`heads` = identity, no `heads.*` in the
    state dict), whose forward returns the class token after the final LayerNorm (`encoder.ln`):
    what MoCo v3's linear probe reads in place of timm's `head` (main_lincls.py:156-189; timm
    0.4.9 vision_transformer.py:291-302) and DINO's kNN (dino vision_transformer.py:209-214);
    DINO's linear probe reads more (common/evaluation.py `DinoLinearFeatures`). Images of another
    size than `image_size` (multi-crop: 96 px crops of a 224 px model) get bicubically
    interpolated position embeddings, as DINO's (vision_transformer.py:174-194). `drop_path_rate`
    > 0: stochastic depth (`add_stochastic_depth`); at 0 the network is exactly torchvision's."""

    def __init__(self, image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim=None,
                 drop_path_rate=0.0):
        super().__init__(image_size, patch_size, num_layers, num_heads, hidden_dim,
                         mlp_dim or 4 * hidden_dim)  # common/model.py VIT_MLP_RATIO
        self.heads = nn.Identity()
        self.feature_dim = hidden_dim
        add_stochastic_depth(self, drop_path_rate)

    def position_embedding(self, rows, cols):
        """[1, 1 + rows*cols, D]: the class token's embedding and the patch grid's, resized."""
        native = self.image_size // self.patch_size
        embedding = self.encoder.pos_embedding  # [1, 1 + native*native, D]
        if (rows, cols) == (native, native):
            return embedding
        grid = embedding[:, 1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
        # DINO's exact call: a scale factor, not a size, nudged by 0.1 so that the output size
        # does not round down (dino issue #8). The factor also sets where each output samples
        # its input, so results differ slightly from size=(rows, cols).
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / native, (cols + 0.1) / native),
                             mode="bicubic")  # [1, D, rows, cols]
        return torch.cat([embedding[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def embed(self, images):
        """Images [N, 3, H, W] -> the tokens [N, 1 + H/p * W/p, D] entering the first block."""
        n, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise UserError(f"{h}x{w} px images do not divide into the ViT's {p}x{p} patches")
        tokens = self.conv_proj(images).flatten(2).transpose(1, 2)  # [N, h/p * w/p, D]
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        return self.encoder.dropout(tokens + self.position_embedding(h // p, w // p))

    def forward(self, images):
        return self.encoder.ln(self.encoder.layers(self.embed(images)))[:, 0]  # [N, D]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch, as DINO's DropPath
    (vision_transformer.py:27-46): in training, each sample's branch is dropped with probability
    `p` and the kept ones divided by 1 - p; the identity in eval mode. (torchvision's
    StochasticDepth multiplies by 1 / (1 - p) rounded to the input's dtype: biased in bf16.)"""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)  # [N, 1, 1]
        return x / (1 - self.p) * keep

    def extra_repr(self):
        return f"p={self.p}"


def add_stochastic_depth(vit, rate):
    """Stochastic depth in the blocks of a torchvision ViT at rates linspace(0, rate, depth), DINO's
    rule (vision_transformer.py:150; its student trains with 0.1, main_dino.py:105, :162-165).
    torchvision's EncoderBlock computes x = input + dropout(attention(ln_1(input))), then x +
    mlp(ln_2(x)): a DropPath after `dropout` and `mlp` drops each branch as DINO's Block does
    (:111-112). No weights are added; blocks at rate 0 stay as they are. Returns vit."""
    blocks = vit.encoder.layers
    for block, p in zip(blocks, torch.linspace(0, rate, len(blocks), device="cpu").tolist()):
        if p > 0:
            block.dropout = nn.Sequential(block.dropout, DropPath(p))
            block.mlp.append(DropPath(p))
    return vit


def dino_vit_init(vit):
    """DINO's initialisation of a torchvision-keyed ViT (dino vision_transformer.py:161-172):
    position embedding, class token and every linear weight (q, k, v as one matrix, timm's
    `qkv`) truncated normal with std 0.02, biases 0, LayerNorms 1 and 0; the patch projection
    keeps PyTorch's Conv2d default, which DINO's `_init_weights` does not touch. Returns vit."""
    def trunc_normal(tensor):  # DINO's trunc_normal_(std=.02): bounds -2, 2 in absolute value
        nn.init.trunc_normal_(tensor, std=0.02, a=-2.0, b=2.0)
    trunc_normal(vit.encoder.pos_embedding)
    trunc_normal(vit.class_token)
    for module in vit.modules():
        if isinstance(module, nn.MultiheadAttention):
            trunc_normal(module.in_proj_weight)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.Linear):  # attention output and MLP layers
            trunc_normal(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    vit.conv_proj.reset_parameters()
    return vit


def sincos_position_embedding(grid_size, width):
    """MoCo v3's fixed 2D sin-cos position embedding [1, 1 + grid_size**2, width] (moco-v3
    vits.py:53-69): zeros for the class token; for the patch in row r, column c (tokens in
    row-major order), [sin(r w), cos(r w), sin(c w), cos(c w)] with w_k = 10000**(-k/q), k < q =
    width/4. MoCo v3 calls the row part `w`: meshgrid's default 'ij' indexing makes its first
    grid vary along the rows of the flattened token order."""
    quarter = width // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [q]
    index = torch.arange(grid_size, dtype=torch.float32)
    rows = index.repeat_interleave(grid_size)[:, None] * omega  # [G*G, q]: token m, row m // G
    cols = index.repeat(grid_size)[:, None] * omega  # column m % G
    patches = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), patches])[None]


def mocov3_vit_init(vit, freeze_patch_projection=True):
    """MoCo v3's initialisation of a torchvision-keyed ViT (moco-v3 vits.py:25-51): the fixed
    sin-cos position embedding, frozen (:29, :68-69); every linear xavier-uniform with zero bias,
    q, k and v each as its own matrix (:32-40); class token N(0, 1e-6) (:41); patch projection
    uniform with the xavier bound of a 3*p*p -> width linear map, zero bias (:43-47), frozen with
    `freeze_patch_projection` (`--stop-grad-conv1`, :49-51: the random patch projection that the
    MoCo v3 paper, section 4.2, finds to stabilise training). LayerNorms keep 1 and 0, as timm's."""
    if vit.hidden_dim % 4:
        raise UserError(f"MoCo v3's sin-cos position embedding needs a width divisible by 4, "
                        f"not {vit.hidden_dim}")
    with torch.no_grad():
        vit.encoder.pos_embedding.copy_(
            sincos_position_embedding(vit.image_size // vit.patch_size, vit.hidden_dim))
    vit.encoder.pos_embedding.requires_grad_(False)
    for module in vit.modules():
        if isinstance(module, nn.MultiheadAttention):  # timm's `qkv`: [3D, D] in one matrix
            bound = math.sqrt(6.0 / (module.embed_dim + module.embed_dim))
            nn.init.uniform_(module.in_proj_weight, -bound, bound)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.Linear):  # attention output and MLP layers
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(vit.class_token, std=1e-6)
    projection = vit.conv_proj
    bound = math.sqrt(6.0 / (3 * vit.patch_size * vit.patch_size + vit.hidden_dim))
    nn.init.uniform_(projection.weight, -bound, bound)
    nn.init.zeros_(projection.bias)
    projection.requires_grad_(not freeze_patch_projection)
    return vit
