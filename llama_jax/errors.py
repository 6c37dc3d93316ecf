"""Every error llama_jax raises about its user's input derives from `LlamaJaxError`.

The command lines catch `LlamaJaxError` once and print its message as one line (exit status 1); a message
names the file, key or value at fault and what was expected. It derives from ValueError, so code written
against the older per-module errors (all ValueErrors but two) keeps working.
"""

from __future__ import annotations

from typing import Dict


class LlamaJaxError(ValueError):
    """Base of every user-facing llama_jax error."""


class ConfigError(LlamaJaxError):
    """A config file or value that cannot describe a Llama model."""


class LayoutError(LlamaJaxError):
    """A tensor whose name or shape does not fit the model's parameter spec."""


class ConversionError(LlamaJaxError):
    """A source or destination that cannot be converted; the message names the file, key and values."""


class SafetensorsError(ConversionError):
    """A safetensors file that is truncated, malformed or does not hold what it should."""


class CheckpointError(LlamaJaxError):
    """A llama_jax parameter checkpoint or training checkpoint that is missing, of another layout, or damaged."""


class CorruptCheckpointError(CheckpointError):
    """Stored checkpoint data that is missing or damaged (a lost chunk, bytes that fail their checksum): a
    training run falls back to an older checkpoint on it, where a mismatch of model or settings stops it."""


class MeshError(LlamaJaxError):
    """A mesh that does not fit the devices or the model."""


class TokenizerError(LlamaJaxError):
    """A tokenizer file that is missing, unreadable or of an unknown kind."""


class DataError(LlamaJaxError):
    """Training data that is missing, malformed or does not fit the model."""


class RunConfigError(LlamaJaxError):
    """A run config (recipe file or key=value override) with an unknown key or a bad value."""


class TrainError(LlamaJaxError):
    """A training run that cannot start or continue as configured."""


class SamplingError(LlamaJaxError):
    """A prompt, sampling setting or sampler input that cannot be used."""


class ImageError(SamplingError):
    """An image input (Llama 3.2 Vision) that cannot be used: an unreadable file, a count that does not match
    the prompt's <|image|> tokens, more tiles than the model has, an image for a text-only model."""


class EvalError(LlamaJaxError):
    """An evaluation task, task list or evaluation setting (lm-evaluation-harness) that cannot be used."""


class StorageError(LlamaJaxError):
    """A Cloud Storage path (gs://BUCKET/PATH) that is malformed, missing, or cannot be read or written."""


class PublishError(StorageError):
    """Publishing a finished gs:// output failed part-way: the complete output is kept at its staging prefix
    (named in the message), and the destination has no marker files, so no reader takes it for a whole one."""


class HubError(LlamaJaxError):
    """A Hugging Face Hub repository (hf://org/name) that cannot be fetched or pushed: missing, gated, offline."""


class AotError(LlamaJaxError):
    """A topology, mesh or recipe that cannot be compiled ahead of time; the message lists the valid choices."""


class DoesNotFit(LlamaJaxError):
    """The TPU compiler refused the program: its buffers exceed the chip's HBM. `inputs` holds the per-device
    bytes of the named inputs; the message gives XLA's numbers."""

    def __init__(self, name: str, inputs: Dict[str, int], message: str):
        super().__init__(message)
        self.name, self.inputs = name, inputs


def plural(n: int, noun: str) -> str:
    """'1 device', '2 devices': counts in messages."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
