"""Job configuration: schema, loading, overrides, validation."""

from hpcfl.config.load import Job, apply_overrides, canonical_json, job_from_dict, load_job, parse_override

__all__ = ["Job", "load_job", "job_from_dict", "apply_overrides", "parse_override", "canonical_json"]
