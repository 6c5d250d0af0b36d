"""Hugging Face interop: one module per architecture family.

llama.py: GQA + SwiGLU <-> LlamaForCausalLM / Qwen2ForCausalLM.
"""

from llmtrain.hf.llama import from_hf_state_dict, hf_name, llama_config, to_hf_state_dict

__all__ = ["from_hf_state_dict", "hf_name", "llama_config", "to_hf_state_dict"]
