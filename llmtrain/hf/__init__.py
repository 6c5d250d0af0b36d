"""Hugging Face interop: one module per architecture family.

llama.py: GQA + SwiGLU <-> LlamaForCausalLM / Qwen2ForCausalLM.
qwen2_moe.py: GQA + MoE <-> Qwen2MoeForCausalLM (same function names, use the module).
deepseek.py: MLA + SwiGLU <-> DeepseekV3ForCausalLM (same function names, use the module).
"""

from llmtrain.hf import deepseek, qwen2_moe
from llmtrain.hf.llama import from_hf_state_dict, hf_name, llama_config, to_hf_state_dict

__all__ = ["deepseek", "from_hf_state_dict", "hf_name", "llama_config", "qwen2_moe", "to_hf_state_dict"]
