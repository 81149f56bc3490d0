"""edgespec.devices: facts about the machine the runtime runs on (threads, memory) and device profiles (measured
forward times of a bundle's models on one machine; docs/device-profiles.md).

Importing this package loads no ONNX Runtime session: measuring (`measure_profile`) imports the runner on demand.
"""

from .memory import (MemoryBudgetError, available_memory_mb, check_memory, estimate_memory_mb, kv_cache_bytes,
                     model_file_bytes, total_memory_mb)
from .profile import (DeviceProfile, ProfileError, ProfileWarning, bundle_key, default_profile_path, describe_device,
                      find_profile, list_profiles, load_profile, measure_profile, resolve_device, user_profiles_dir)

__all__ = [
    "DeviceProfile", "MemoryBudgetError", "ProfileError", "ProfileWarning", "available_memory_mb", "bundle_key",
    "check_memory", "default_profile_path", "describe_device", "estimate_memory_mb", "find_profile",
    "kv_cache_bytes", "list_profiles", "load_profile", "measure_profile", "model_file_bytes", "resolve_device",
    "total_memory_mb", "user_profiles_dir",
]
