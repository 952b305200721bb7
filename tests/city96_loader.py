"""city96's ComfyUI_ExtraModels PixArt LoRA loader, vendored so that tests can run it on exported files.

Source: https://github.com/city96/ComfyUI_ExtraModels at commit
92f556ed4d3bec1a3f16117d2de10f195c36d68e (2024-12-17), Apache-2.0 (the repository's
LICENSE). ``PixArt/lora.py`` last changed in 193c2fd (2024-08-07) and
``PixArt/diffusers_convert.py`` in 6fb8649 (2024-07-27); the node "PixArt Load
LoRA" (``PixArt/nodes.py``) reads the file with ``comfy.utils.load_torch_file`` and
calls ``load_pixart_lora(model, lora, lora_path, strength)``.

Copied verbatim (tabs expanded to four spaces, CRLF line ends and trailing blanks
dropped, nothing else changed):

- ``PixArt/diffusers_convert.py`` lines 6-82 (``conversion_map_ms``, ``get_depth``,
  ``get_lora_depth``, ``get_conversion_map``, ``find_prefix``) and 121-223
  (``convert_lora_state_dict``);
- ``PixArt/lora.py`` lines 10-62 (``EXM_PixArt_ModelPatcher.calculate_weight``, the
  patch code that ran on ComfyUI before 0.1.1) and 91-146 (``find_peft_alpha``,
  ``load_pixart_lora``).

ComfyUI itself cannot be installed here, so the comfy calls those lines make are
served by minimal equivalents written below from ComfyUI's behaviour (not copied):

- ``comfy.lora.load_lora(lora, key_map)``: for each key ``k`` of ``key_map`` with a
  ``k.lora_up.weight`` and ``k.lora_down.weight``, the patch
  ``("lora", (up, down, alpha, None, None, None))`` under ``key_map[k]``, alpha from
  a ``k.alpha`` tensor or None; the only LoRA names these files hold.
- ``comfy.model_management.cast_to_device(t, device, dtype)``: ``t.to(device, dtype)``.
- ``comfy.model_patcher.ModelPatcher`` and ``replace_model_patcher`` (lora.py lines
  64-89, which copy ComfyUI patcher state): :class:`ModelPatcher` keeps the patches
  of keys the model has, as ``add_patches`` does.
- Since ComfyUI 0.1.1 (August 2024) the model patcher applies patches with
  ``comfy.lora.calculate_weight`` and no longer calls the patcher's own
  ``calculate_weight``, so city96's fused-q/k/v code above does not run:
  :func:`calculate_weight_current` is that function's LoRA branch (``alpha / rank``
  with rank = the down matrix's rows, ``up @ down`` reshaped to the weight; an
  error is logged and the weight left as it was when the shapes do not multiply).
"""

# ruff: noqa  (the copied code keeps its own style)
from __future__ import annotations

import json
import logging
import os
import types

import torch

logger = logging.getLogger(__name__)


# --- minimal equivalents of the comfy calls ----------------------------------------------


def _load_lora(lora, to_load):
    patch_dict = {}
    for x in to_load:
        up, down = lora.get(f"{x}.lora_up.weight"), lora.get(f"{x}.lora_down.weight")
        if up is None or down is None:
            continue
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        patch_dict[to_load[x]] = ("lora", (up, down, alpha, None, None, None))
    return patch_dict


def _cast_to_device(tensor, device, dtype):
    return tensor.to(device=device, dtype=dtype)


comfy = types.SimpleNamespace(
    lora=types.SimpleNamespace(load_lora=_load_lora),
    model_management=types.SimpleNamespace(cast_to_device=_cast_to_device),
)


class ModelPatcher:
    """The part of ComfyUI's model patcher the loader touches: patches per model weight key."""

    def __init__(self, model_keys):
        self.model_keys = set(model_keys)
        self.patches = {}

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        added = []
        for key, patch in patches.items():
            if key in self.model_keys:
                self.patches.setdefault(key, []).append((strength_patch, patch, strength_model))
                added.append(key)
        return added

    def clone(self):
        copy = type(self)(self.model_keys)
        copy.patches = {key: list(patches) for key, patches in self.patches.items()}
        return copy


def replace_model_patcher(model):
    new = EXM_PixArt_ModelPatcher(model.model_keys)
    new.patches = {key: list(patches) for key, patches in model.patches.items()}
    return new


def calculate_weight_current(patches, weight, key):
    """ComfyUI >= 0.1.1: ``comfy.lora.calculate_weight`` for LoRA patches."""
    for strength, (patch_type, v), strength_model in patches:
        if strength_model != 1.0:
            weight *= strength_model
        up, down = v[0].float(), v[1].float()
        alpha = v[2] / down.shape[0] if v[2] is not None else 1.0
        try:
            diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
        except RuntimeError as error:
            logger.error("ERROR %s %s %s", patch_type, key, error)
            continue
        weight += (strength * alpha * diff).type(weight.dtype)
    return weight


# --- PixArt/diffusers_convert.py lines 6-82 -------------------------------------------------

conversion_map_ms = [ # for multi_scale_train (MS)
    # Resolution
    ("csize_embedder.mlp.0.weight", "adaln_single.emb.resolution_embedder.linear_1.weight"),
    ("csize_embedder.mlp.0.bias",   "adaln_single.emb.resolution_embedder.linear_1.bias"),
    ("csize_embedder.mlp.2.weight", "adaln_single.emb.resolution_embedder.linear_2.weight"),
    ("csize_embedder.mlp.2.bias",   "adaln_single.emb.resolution_embedder.linear_2.bias"),
    # Aspect ratio
    ("ar_embedder.mlp.0.weight", "adaln_single.emb.aspect_ratio_embedder.linear_1.weight"),
    ("ar_embedder.mlp.0.bias",   "adaln_single.emb.aspect_ratio_embedder.linear_1.bias"),
    ("ar_embedder.mlp.2.weight", "adaln_single.emb.aspect_ratio_embedder.linear_2.weight"),
    ("ar_embedder.mlp.2.bias",   "adaln_single.emb.aspect_ratio_embedder.linear_2.bias"),
]

def get_depth(state_dict):
    return sum(key.endswith('.attn1.to_k.bias') for key in state_dict.keys())

def get_lora_depth(state_dict):
    cnt = max([
        sum(key.endswith('.attn1.to_k.lora_A.weight') for key in state_dict.keys()),
        sum(key.endswith('_attn1_to_k.lora_A.weight') for key in state_dict.keys()),
        sum(key.endswith('.attn1.to_k.lora_up.weight') for key in state_dict.keys()),
        sum(key.endswith('_attn1_to_k.lora_up.weight') for key in state_dict.keys()),
    ])
    assert cnt > 0, "Unable to detect model depth!"
    return cnt

def get_conversion_map(state_dict):
    conversion_map = [  # main SD conversion map (PixArt reference, HF Diffusers)
        # Patch embeddings
        ("x_embedder.proj.weight", "pos_embed.proj.weight"),
        ("x_embedder.proj.bias", "pos_embed.proj.bias"),
        # Caption projection
        ("y_embedder.y_embedding", "caption_projection.y_embedding"),
        ("y_embedder.y_proj.fc1.weight", "caption_projection.linear_1.weight"),
        ("y_embedder.y_proj.fc1.bias", "caption_projection.linear_1.bias"),
        ("y_embedder.y_proj.fc2.weight", "caption_projection.linear_2.weight"),
        ("y_embedder.y_proj.fc2.bias", "caption_projection.linear_2.bias"),
        # AdaLN-single LN
        ("t_embedder.mlp.0.weight", "adaln_single.emb.timestep_embedder.linear_1.weight"),
        ("t_embedder.mlp.0.bias", "adaln_single.emb.timestep_embedder.linear_1.bias"),
        ("t_embedder.mlp.2.weight", "adaln_single.emb.timestep_embedder.linear_2.weight"),
        ("t_embedder.mlp.2.bias", "adaln_single.emb.timestep_embedder.linear_2.bias"),
        # Shared norm
        ("t_block.1.weight", "adaln_single.linear.weight"),
        ("t_block.1.bias", "adaln_single.linear.bias"),
        # Final block
        ("final_layer.linear.weight", "proj_out.weight"),
        ("final_layer.linear.bias", "proj_out.bias"),
        ("final_layer.scale_shift_table", "scale_shift_table"),
    ]

    # Add actual transformer blocks
    for depth in range(get_depth(state_dict)):
        # Transformer blocks
        conversion_map += [
            (f"blocks.{depth}.scale_shift_table", f"transformer_blocks.{depth}.scale_shift_table"),
            # Projection
            (f"blocks.{depth}.attn.proj.weight", f"transformer_blocks.{depth}.attn1.to_out.0.weight"),
            (f"blocks.{depth}.attn.proj.bias",   f"transformer_blocks.{depth}.attn1.to_out.0.bias"),
            # Feed-forward
            (f"blocks.{depth}.mlp.fc1.weight", f"transformer_blocks.{depth}.ff.net.0.proj.weight"),
            (f"blocks.{depth}.mlp.fc1.bias",   f"transformer_blocks.{depth}.ff.net.0.proj.bias"),
            (f"blocks.{depth}.mlp.fc2.weight", f"transformer_blocks.{depth}.ff.net.2.weight"),
            (f"blocks.{depth}.mlp.fc2.bias",   f"transformer_blocks.{depth}.ff.net.2.bias"),
            # Cross-attention (proj)
            (f"blocks.{depth}.cross_attn.proj.weight" ,f"transformer_blocks.{depth}.attn2.to_out.0.weight"),
            (f"blocks.{depth}.cross_attn.proj.bias"   ,f"transformer_blocks.{depth}.attn2.to_out.0.bias"),
        ]
    return conversion_map

def find_prefix(state_dict, target_key):
    prefix = ""
    for k in state_dict.keys():
        if k.endswith(target_key):
            prefix = k.split(target_key)[0]
            break
    return prefix

# --- PixArt/diffusers_convert.py lines 121-223 ---------------------------------------------

# Same as above but for LoRA weights:
def convert_lora_state_dict(state_dict, peft=True):
    # koyha
    rep_ak = lambda x: x.replace(".weight", ".lora_down.weight")
    rep_bk = lambda x: x.replace(".weight", ".lora_up.weight")
    rep_pk = lambda x: x.replace(".weight", ".alpha")
    if peft: # peft
        rep_ap = lambda x: x.replace(".weight", ".lora_A.weight")
        rep_bp = lambda x: x.replace(".weight", ".lora_B.weight")
        rep_pp = lambda x: x.replace(".weight", ".alpha")

        prefix = find_prefix(state_dict, "adaln_single.linear.lora_A.weight")
        state_dict = {k[len(prefix):]:v for k,v in state_dict.items()}
    else: # OneTrainer
        rep_ap = lambda x: x.replace(".", "_")[:-7] + ".lora_down.weight"
        rep_bp = lambda x: x.replace(".", "_")[:-7] + ".lora_up.weight"
        rep_pp = lambda x: x.replace(".", "_")[:-7] + ".alpha"

        prefix = "lora_transformer_"
        t5_marker = "lora_te_encoder"
        t5_keys = []
        for key in list(state_dict.keys()):
            if key.startswith(prefix):
                state_dict[key[len(prefix):]] = state_dict.pop(key)
            elif t5_marker in key:
                t5_keys.append(state_dict.pop(key))
        if len(t5_keys) > 0:
            print(f"Text Encoder not supported for PixArt LoRA, ignoring {len(t5_keys)} keys")

    cmap = []
    cmap_unet = get_conversion_map(state_dict) + conversion_map_ms # todo: 512 model
    for k, v in cmap_unet:
        if v.endswith(".weight"):
            cmap.append((rep_ak(k), rep_ap(v)))
            cmap.append((rep_bk(k), rep_bp(v)))
            if not peft:
                cmap.append((rep_pk(k), rep_pp(v)))

    missing = [k for k,v in cmap if v not in state_dict]
    new_state_dict = {k: state_dict[v] for k,v in cmap if k not in missing}
    matched = list(v for k,v in cmap if v in state_dict.keys())

    lora_depth = get_lora_depth(state_dict)
    for fp, fk in ((rep_ap, rep_ak),(rep_bp, rep_bk)):
        for depth in range(lora_depth):
            # Self Attention
            key = lambda a: fp(f"transformer_blocks.{depth}.attn1.to_{a}.weight")
            new_state_dict[fk(f"blocks.{depth}.attn.qkv.weight")] = torch.cat((
                state_dict[key('q')], state_dict[key('k')], state_dict[key('v')]
            ), dim=0)

            matched += [key('q'), key('k'), key('v')]
            if not peft:
                akey = lambda a: rep_pp(f"transformer_blocks.{depth}.attn1.to_{a}.weight")
                new_state_dict[rep_pk((f"blocks.{depth}.attn.qkv.weight"))] = state_dict[akey("q")]
                matched += [akey('q'), akey('k'), akey('v')]

            # Self Attention projection?
            key = lambda a: fp(f"transformer_blocks.{depth}.attn1.to_{a}.weight")
            new_state_dict[fk(f"blocks.{depth}.attn.proj.weight")] = state_dict[key('out.0')]
            matched += [key('out.0')]

            # Cross-attention (linear)
            key = lambda a: fp(f"transformer_blocks.{depth}.attn2.to_{a}.weight")
            new_state_dict[fk(f"blocks.{depth}.cross_attn.q_linear.weight")]  = state_dict[key('q')]
            new_state_dict[fk(f"blocks.{depth}.cross_attn.kv_linear.weight")] = torch.cat((
                state_dict[key('k')], state_dict[key('v')]
            ), dim=0)
            matched += [key('q'), key('k'), key('v')]
            if not peft:
                akey = lambda a: rep_pp(f"transformer_blocks.{depth}.attn2.to_{a}.weight")
                new_state_dict[rep_pk((f"blocks.{depth}.cross_attn.q_linear.weight"))]  = state_dict[akey("q")]
                new_state_dict[rep_pk((f"blocks.{depth}.cross_attn.kv_linear.weight"))] = state_dict[akey("k")]
                matched += [akey('q'), akey('k'), akey('v')]

            # Cross Attention projection?
            key = lambda a: fp(f"transformer_blocks.{depth}.attn2.to_{a}.weight")
            new_state_dict[fk(f"blocks.{depth}.cross_attn.proj.weight")] = state_dict[key('out.0')]
            matched += [key('out.0')]

            try:
                key = fp(f"transformer_blocks.{depth}.ff.net.0.proj.weight")
                new_state_dict[fk(f"blocks.{depth}.mlp.fc1.weight")]  = state_dict[key]
                matched += [key]
            except KeyError:
                pass

            try:
                key = fp(f"transformer_blocks.{depth}.ff.net.2.weight")
                new_state_dict[fk(f"blocks.{depth}.mlp.fc2.weight")]  = state_dict[key]
                matched += [key]
            except KeyError:
                pass

    if len(matched) < len(state_dict):
        print(f"PixArt: LoRA conversion has leftover keys! ({len(matched)} vs {len(state_dict)})")
        print(list( set(state_dict.keys()) - set(matched) ))

    if len(missing) > 0:
        print(f"PixArt: LoRA conversion has missing keys! (probably)")
        print(missing)

    return new_state_dict


# --- PixArt/lora.py lines 10-62 --------------------------------------------------------------

class EXM_PixArt_ModelPatcher(ModelPatcher):
    def calculate_weight(self, patches, weight, key):
        """
        This is almost the same as the comfy function, but stripped down to just the LoRA patch code.
        The problem with the original code is the q/k/v keys being combined into one for the attention.
        In the diffusers code, they're treated as separate keys, but in the reference code they're recombined (q+kv|qkv).
        This means, for example, that the [1152,1152] weights become [3456,1152] in the state dict.
        The issue with this is that the LoRA weights are [128,1152],[1152,128] and become [384,1162],[3456,128] instead.

        This is the best thing I could think of that would fix that, but it's very fragile.
         - Check key shape to determine if it needs the fallback logic
         - Cut the input into parts based on the shape (undoing the torch.cat)
         - Do the matrix multiplication logic
         - Recombine them to match the expected shape
        """
        for p in patches:
            alpha = p[0]
            v = p[1]
            strength_model = p[2]
            if strength_model != 1.0:
                weight *= strength_model

            if isinstance(v, list):
                v = (self.calculate_weight(v[1:], v[0].clone(), key), )

            if len(v) == 2:
                patch_type = v[0]
                v = v[1]

            if patch_type == "lora":
                mat1 = comfy.model_management.cast_to_device(v[0], weight.device, torch.float32)
                mat2 = comfy.model_management.cast_to_device(v[1], weight.device, torch.float32)
                if v[2] is not None:
                    alpha *= v[2] / mat2.shape[0]
                try:
                    mat1 = mat1.flatten(start_dim=1)
                    mat2 = mat2.flatten(start_dim=1)

                    ch1 = mat1.shape[0] // mat2.shape[1]
                    ch2 = mat2.shape[0] // mat1.shape[1]
                    ### Fallback logic for shape mismatch ###
                    if mat1.shape[0] != mat2.shape[1] and ch1 == ch2 and (mat1.shape[0]/mat2.shape[1])%1 == 0:
                        mat1 = mat1.chunk(ch1, dim=0)
                        mat2 = mat2.chunk(ch1, dim=0)
                        weight += torch.cat(
                            [alpha * torch.mm(mat1[x], mat2[x]) for x in range(ch1)],
                            dim=0,
                        ).reshape(weight.shape).type(weight.dtype)
                    else:
                        weight += (alpha * torch.mm(mat1, mat2)).reshape(weight.shape).type(weight.dtype)
                except Exception as e:
                    print("ERROR", key, e)
        return weight


# --- PixArt/lora.py lines 91-146 -------------------------------------------------------------

def find_peft_alpha(path):
    def load_json(json_path):
        with open(json_path) as f:
            data = json.load(f)
        alpha = data.get("lora_alpha")
        alpha = alpha or data.get("alpha")
        if not alpha:
            print(" Found config but `lora_alpha` is missing!")
        else:
            print(f" Found config at {json_path} [alpha:{alpha}]")
        return alpha

    # For some weird reason peft doesn't include the alpha in the actual model
    print("PixArt: Warning! This is a PEFT LoRA. Trying to find config...")
    files = [
        f"{os.path.splitext(path)[0]}.json",
        f"{os.path.splitext(path)[0]}.config.json",
        os.path.join(os.path.dirname(path),"adapter_config.json"),
    ]
    for file in files:
        if os.path.isfile(file):
            return load_json(file)

    print(" Missing config/alpha! assuming alpha of 8. Consider converting it/adding a config json to it.")
    return 8.0

def load_pixart_lora(model, lora, lora_path, strength):
    k_back = lambda x: x.replace(".lora_up.weight", "")
    # need to convert the actual weights for this to work.
    if any(True for x in lora.keys() if x.endswith("adaln_single.linear.lora_A.weight")):
        lora = convert_lora_state_dict(lora, peft=True)
        alpha = find_peft_alpha(lora_path)
        lora.update({f"{k_back(x)}.alpha":torch.tensor(alpha) for x in lora.keys() if "lora_up" in x})
    else: # OneTrainer
        lora = convert_lora_state_dict(lora, peft=False)

    key_map = {k_back(x):f"diffusion_model.{k_back(x)}.weight" for x in lora.keys() if "lora_up" in x} # fake

    loaded = comfy.lora.load_lora(lora, key_map)
    if model is not None:
        # switch to custom model patcher when using LoRAs
        if isinstance(model, EXM_PixArt_ModelPatcher):
            new_modelpatcher = model.clone()
        else:
            new_modelpatcher = replace_model_patcher(model)
        k = new_modelpatcher.add_patches(loaded, strength)
    else:
        k = ()
        new_modelpatcher = None

    k = set(k)
    for x in loaded:
        if (x not in k):
            print("NOT LOADED", x)

    return new_modelpatcher
