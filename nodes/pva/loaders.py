"""PVA Load Encoder and PVA Load Identity: an identity encoder from models/pva_encoders, a PVA identity from
models/pva_identities."""
from __future__ import annotations

from comfy_api.latest import io

from ...sefi_core.pva.identity import load_pva_identity
from ...sefi_core.pva.model_files import load_encoder
from ..folders import PVA_ENCODER_FOLDER, PVA_IDENTITY_FOLDER
from ..loaders import FileLoader, put_file_advice
from ..node_ui import schema
from .sockets import EncoderType, PVAIdentityType


class PVALoadEncoder(FileLoader):
    FOLDER, FILE_INPUT, WHAT = PVA_ENCODER_FOLDER, "encoder_file", "PVA identity encoder"
    ADVICE = put_file_advice(PVA_ENCODER_FOLDER)

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PVALoadEncoder",
            display_name="PVA Load Encoder",
            search_aliases=["identity encoder", "face encoder", "load encoder"],
            category="PVA",
            description="Loads a PVA identity encoder (face features of 1-5 photos -> 10 visual tokens) from "
                        "models/pva_encoders. No pretrained one exists publicly: it is trained on a dataset of many "
                        "people (see the README).",
            inputs=[cls.file_input("A PVA encoder in models/pva_encoders. Press R to refresh the list.")],
            outputs=[EncoderType.Output(display_name="pva_encoder", tooltip="For PVA Fine-tune Identity.")],
        )

    @classmethod
    def execute(cls, encoder_file) -> io.NodeOutput:
        return io.NodeOutput(load_encoder(cls.path(encoder_file)))


class PVALoadIdentity(FileLoader):
    FOLDER, FILE_INPUT, WHAT = PVA_IDENTITY_FOLDER, "pva_identity_file", "PVA identity"
    ADVICE = put_file_advice(PVA_IDENTITY_FOLDER)

    @classmethod
    def define_schema(cls):
        return schema(
            node_id="PVALoadIdentity",
            display_name="PVA Load Identity",
            search_aliases=["load identity", "inpaint face", "face id"],
            category="PVA",
            description="Loads a PVA identity (visual tokens, visual projections and learned word of one person) from "
                        "models/pva_identities. Connect it to PVA Apply.",
            inputs=[cls.file_input("A PVA identity in models/pva_identities. Press R to refresh the list.")],
            outputs=[PVAIdentityType.Output(display_name="pva_identity", tooltip="The identity, for PVA Apply."),
                     io.String.Output(display_name="trigger", tooltip="Its learned word, e.g. 'sks': prompt "
                                                                      "'photo of a sks person'.")],
        )

    @classmethod
    def execute(cls, pva_identity_file) -> io.NodeOutput:
        identity = load_pva_identity(cls.path(pva_identity_file))
        return io.NodeOutput(identity, identity.trigger)
