"""Seeded synthetic chest-CT phantoms with voxel ground truth (the project's labelled test bed).

``generate_phantom(PhantomConfig(label, seed, ...))`` builds one case in memory; ``write_case`` writes it as
NIfTI + a DICOM series + masks + ``truth.json``; ``synthesize_cohort`` writes a labelled cohort with manifests.
See ``docs/phantoms.md`` for the anatomy and lesion models and their gaps from real CT.
"""
from .phantom import DATA_SOURCE, GENERATOR_VERSION, Phantom, PhantomConfig, generate_phantom
from .writer import case_seed, synthesize_cohort, truth_dict, write_case

__all__ = [
    "DATA_SOURCE",
    "GENERATOR_VERSION",
    "Phantom",
    "PhantomConfig",
    "case_seed",
    "generate_phantom",
    "synthesize_cohort",
    "truth_dict",
    "write_case",
]
