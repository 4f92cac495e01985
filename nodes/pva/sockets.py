"""PVA's link types, declared once: a PVA identity, a face-feature source (ArcFace or CLIP vision) and an identity
encoder."""
from comfy_api.latest import io

PVAIdentityType = io.Custom("PVA_IDENTITY")
FaceRecognizerType = io.Custom("PVA_FACE_RECOGNIZER")
EncoderType = io.Custom("PVA_ENCODER")
