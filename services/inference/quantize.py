"""Builds quantized model store entries from an unquantized one with compressed-tensors (the checkpoint format
vLLM reads, and the library LLM Compressor writes it with): weights stored as int8 with one scale per output
channel, activations quantized per token at run time (W8A8 int8, which vLLM's CPU engine runs with its
oneDNN int8 kernels). Needs no calibration data: every scale comes from the weights themselves."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# The layers that stay unquantized: the output projection decides every token's logits (and is tied to
# the input embedding in SmolLM2).
IGNORED = ["lm_head"]


def w8a8_writer(source: Path) -> Callable[[Path], None]:
    """A model store writer that stores source's Linear layers as W8A8 int8 in compressed-tensors format."""

    def write(target: Path) -> None:
        import torch
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.offload import update_offload_parameter
        from compressed_tensors.quantization import (
            QuantizationConfig,
            QuantizationStatus,
            apply_quantization_config,
            preset_name_to_scheme,
        )
        from compressed_tensors.quantization.utils import calculate_qparams
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("quantizing to W8A8 int8", extra={"source": str(source), "target": str(target)})
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        config = QuantizationConfig(
            config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])},
            ignore=IGNORED,
            quantization_status=QuantizationStatus.INITIALIZED,
        )
        apply_quantization_config(model, config)
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            weight = torch.as_tensor(module.weight.data).float()
            # Symmetric per output channel: each row's scale maps its largest magnitude to 127.
            scale, zero_point = calculate_qparams(
                weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True), scheme.weights
            )
            update_offload_parameter(module, "weight_scale", scale.to(module.weight_scale.dtype))
            update_offload_parameter(module, "weight_zero_point", zero_point.to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
        compressor.compress_model(model)
        model.save_pretrained(target)
        compressor.update_config(str(target))
        AutoTokenizer.from_pretrained(source).save_pretrained(target)

    return write
