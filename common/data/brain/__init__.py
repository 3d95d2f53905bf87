"""Brain MRI data: MNI152-based phantoms with known truth, and preparation of real registered volumes."""
