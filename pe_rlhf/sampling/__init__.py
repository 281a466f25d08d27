"""The jit-compiled sampler."""

from pe_rlhf.sampling.sampler import SampleOutput, SamplingConfig, filter_logits, sample, sample_traced, stream

__all__ = ["SampleOutput", "SamplingConfig", "filter_logits", "sample", "sample_traced", "stream"]
