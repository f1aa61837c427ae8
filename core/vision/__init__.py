"""Floor 2: the vision engine: devices, pretrained networks, photo loading, features. Knows no project."""
