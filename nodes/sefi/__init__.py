"""SeFi-IDE's nodes (category SeFi-IDE): train an identity from photos, load it, apply it through the trigger word,
and preview where a prompt's words attend. Imports nothing of nodes/pva/."""
from .apply_stage_tokens import SefiApplyStageTokens
from .attention_preview import SefiAttentionMapPreview
from .load_identity import SefiLoadIdentity
from .train_identity import SefiTrainIdentity

NODES = [SefiTrainIdentity, SefiLoadIdentity, SefiApplyStageTokens, SefiAttentionMapPreview]
