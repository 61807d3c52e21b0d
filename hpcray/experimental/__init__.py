"""Ray's `ray.experimental` modules that Ray programs use: `tqdm_ray`."""
