"""vLLM plugin: entry point group `vllm.general_plugins` (`pip install 'plt-port[vllm]'`).

vLLM calls `register` in every process it starts. It makes both checkpoint formats loadable
as they are, without remote code: transformers learns the two model types (it knows neither),
and vLLM's model registry maps their architectures to `runtimes.models.vllm_model`, which it imports
only when it builds a model. The loop count is the config's (`plt_num_loops`, v1 `loop_num`),
so one engine serves one loop count: `--hf-overrides '{"plt_num_loops": 3}'`.
"""

from __future__ import annotations

import logging

from transformers import AutoConfig, PretrainedConfig

from plt_port.config import ARCHITECTURES, PLT_TYPE, V1_TYPE

logger = logging.getLogger(__name__)


class IQuestPLTCoderConfig(PretrainedConfig):
    """config.json as transformers holds it; `runtimes.models.vllm_model.plt_config` checks it with
    plt_port's PLTConfig when the model is built."""

    model_type = PLT_TYPE


class IQuestLoopCoderConfig(PretrainedConfig):
    model_type = V1_TYPE


class PLTEngineConfig:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`) for LoopCoder-v2: the loop
    carry is per request and is not cached with a prefix, so prefix caching is turned off."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        if vllm_config.cache_config.enable_prefix_caching:
            logger.info("%s: prefix caching turned off (the loop carry is per request)",
                        ARCHITECTURES[PLT_TYPE])
            vllm_config.cache_config.enable_prefix_caching = False

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[ARCHITECTURES[PLT_TYPE]] = PLTEngineConfig

    for config_class in (IQuestPLTCoderConfig, IQuestLoopCoderConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        # For `iquestloopcoder` this replaces vLLM's own model: one implementation, checked
        # against plt_port's reference, runs both formats.
        architecture = ARCHITECTURES[config_class.model_type]
        ModelRegistry.register_model(architecture, f"runtimes.models.vllm_model:{architecture}")
