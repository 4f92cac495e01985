"""PVA's nodes (category PVA): load a face recognizer or read faces with CLIP vision, train an identity encoder,
fine-tune and load a PVA identity, apply it to an inpainting MODEL and its CLIP, measure identity as the paper does.
Imports nothing of nodes/sefi/."""
from .apply import PVAApply
from .face_features import PVAClipVisionFeatures, PVALoadFaceRecognizer
from .fine_tune import PVAFineTuneIdentity
from .identity_similarity import PVAIdentitySimilarity
from .loaders import PVALoadEncoder, PVALoadIdentity
from .train_encoder import PVATrainEncoder

NODES = [PVALoadFaceRecognizer, PVAClipVisionFeatures, PVALoadEncoder, PVATrainEncoder, PVAFineTuneIdentity,
         PVALoadIdentity, PVAApply, PVAIdentitySimilarity]
