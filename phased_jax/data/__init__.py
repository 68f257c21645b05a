"""Instruction data: records (read, validate; single-turn or conversations) -> phases (stratify,
order) -> tokens (template or chat template, mask, pack, cache) -> per-host batches indexed by
step. `pipeline.prepare(cfg)` runs it all."""

from phased_jax.data.loader import PhaseLoader
from phased_jax.data.phases import Phase, build_phases, parse_order, stratify
from phased_jax.data.pipeline import PhaseData, PreparedData, prepare
from phased_jax.data.records import InvalidReport, Record, read_records
from phased_jax.data.tokens import TokenizedExamples, TokenReport, tokenize_cached

__all__ = ["InvalidReport", "Phase", "PhaseData", "PhaseLoader", "PreparedData", "Record",
           "TokenReport", "TokenizedExamples", "build_phases", "parse_order", "prepare",
           "read_records", "stratify", "tokenize_cached"]
