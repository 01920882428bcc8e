"""The Grad-CAM audit job: options, graph, demo, manifest and summary."""
