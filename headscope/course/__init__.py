"Course mode: exercises checked against headscope's own functions, and the notebooks a class gets (`headscope course`)"
from .core import check, quiz, hint

__all__ = ["check", "quiz", "hint"]
