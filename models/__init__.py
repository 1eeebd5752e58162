"""FCOS model ladder (teacher / tutor / edge) and the neck/head knowledge math."""

from models.ladder import PROFILES, ROLES, STRIDES, Profile, build_model, get_profile
from models.parts import knowledge_delta, neck_head, split_parameters, substitute

__all__ = ["PROFILES", "ROLES", "STRIDES", "Profile", "build_model", "get_profile",
           "knowledge_delta", "neck_head", "split_parameters", "substitute"]
