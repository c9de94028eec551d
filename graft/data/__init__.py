"""Images in: decoding, discovery of folders and CSV manifests, the scan, datasets and transforms."""
