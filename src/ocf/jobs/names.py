"""Memorable worker display names (``brave-otter-042``), as the original tracker gave.

Names appear on the leaderboard and in ``/worker/<stage>/<name>`` URLs, so
they are URL-safe and lowercase. The store retries on the rare collision.
"""

from __future__ import annotations

ADJECTIVES = (
    "amber brave calm clever cosmic crisp daring eager fancy fierce gentle glad golden grand happy hidden "
    "humble icy jolly keen lively lucky mellow merry mighty misty nimble noble plucky proud quick quiet "
    "rapid rosy rusty shy silent silver sleek smooth snowy solar sonic spry steady stormy sunny swift "
    "tidy tiny vivid wild wise witty zesty"
).split()
NOUNS = (
    "badger bear beaver bison cobra comet condor crane dingo dolphin eagle falcon ferret finch fox gecko "
    "heron ibis jaguar koala lemur lion llama lynx marten mole moose newt otter owl panda panther parrot "
    "pelican puffin quail raven robin salmon seal shark sparrow squid stoat swan tiger toucan walrus "
    "wombat yak zebra"
).split()


def worker_name(bits: int) -> str:
    """A name from 32 random bits: adjective, noun and a three-digit number."""
    adjective = ADJECTIVES[bits % len(ADJECTIVES)]
    bits //= len(ADJECTIVES)
    noun = NOUNS[bits % len(NOUNS)]
    bits //= len(NOUNS)
    return f"{adjective}-{noun}-{bits % 1000:03d}"
