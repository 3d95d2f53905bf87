"""Metrics: MS-SSIM (fidelity and diversity), FID, paired PSNR / MAE / MS-SSIM."""
