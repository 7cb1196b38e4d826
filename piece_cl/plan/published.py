"""The architecture fields of the paper models' published config.json files (Hugging Face model cards).

Used when `model.path` is neither a local directory nor in the Hugging Face cache: the plan needs the
shapes only, never the weights, so a user can plan a run before downloading anything. A local
config.json always wins (plan/shapes.py).
"""
from __future__ import annotations

LLAMA3_8B = {  # meta-llama/Meta-Llama-3-8B
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
QWEN3_14B = {  # Qwen/Qwen3-14B
    "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
    "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
GEMMA2_2B = {  # google/gemma-2-2b-it
    "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
    "max_position_embeddings": 8192, "sliding_window": 4096, "query_pre_attn_scalar": 256,
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True,
}
LLAVA15_7B = {  # llava-hf/llava-1.5-7b-hf (Vicuna-7B text model, CLIP ViT-L/14 at 336 px)
    "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 576,
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
}
QWEN3_VL_4B = {  # Qwen/Qwen3-VL-4B-Instruct
    "model_type": "qwen3_vl", "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": True,
    "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 2560, "intermediate_size": 9728,
                    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "vocab_size": 151936, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                        "mrope_section": [24, 20, 20], "mrope_interleaved": True}},
    "vision_config": {"model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                      "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "out_hidden_size": 2560, "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]},
}

# hub name (configs/model/*.yaml `path`) -> config.json fields
PUBLISHED = {
    "meta-llama/Meta-Llama-3-8B": LLAMA3_8B,
    "Qwen/Qwen3-14B": QWEN3_14B,
    "google/gemma-2-2b-it": GEMMA2_2B,
    "llava-hf/llava-1.5-7b-hf": LLAVA15_7B,
    "Qwen/Qwen3-VL-4B-Instruct": QWEN3_VL_4B,
}
