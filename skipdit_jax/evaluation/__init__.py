"""Evaluation: image metrics (`image_metrics`: PSNR, SSIM, LPIPS, cosine similarity,
Fréchet distance) and the small MNIST classifier that judges generated digits
(`mnist_classifier`: class accuracy and "classifier FID" features).
`inception`: pytorch-fid's FID Inception-v3 (features for FID, sFID, Inception Score, precision/recall)."""
