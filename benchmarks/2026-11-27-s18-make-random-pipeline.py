"""A random AiM-B pipeline with LlamaGen's VQ-f16 (256x256 images), for timing sample_fid.py."""
import sys

import torch
from diffusers import VQModel

from aim_hf import AiMConfig, AiMForImageGeneration, AiMPipeline
from aim_hf.tokenizer import llamagen_vq_config

torch.manual_seed(0)
aim = AiMForImageGeneration(AiMConfig.from_preset(sys.argv[2]))
with torch.no_grad():
    for p in aim.parameters():
        if not p.any():
            p.normal_(std=0.02)
vq = VQModel(**llamagen_vq_config())
with torch.no_grad():
    for p in vq.parameters():
        if not p.any():
            p.normal_(std=0.02)
AiMPipeline(aim=aim, vqvae=vq).save_pretrained(sys.argv[1])
