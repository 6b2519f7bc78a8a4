"""The one line an in-process restart prints for a fault (``train/fault_notes.py``): the rank at
fault and how, from every rank's note and NVRx's records, never the peer that only saw it."""

from megasmol.train.fault_notes import FaultNote, describe_fault


def test_a_rank_that_raised_is_named_with_its_error_and_the_peer_that_waited_is_left_out():
    notes = [FaultNote(rank=0, at=1.0, raised="RunFailure: the collective with rank 1 failed",
                       nvrx="Interruption.EXCEPTION on ranks={0, 1}", peer=True),
             FaultNote(rank=1, at=1.0, raised="(PlannedFault: raise at step 8)",
                       nvrx="Interruption.EXCEPTION on ranks={1}")]
    assert describe_fault(notes) == "rank 1 raised (PlannedFault: raise at step 8)"


def test_the_most_telling_record_names_a_rank_and_a_lost_rank_is_said_so():
    frozen = FaultNote(rank=0, at=1.0, raised="", nvrx="Interruption.SOFT_TIMEOUT on ranks={1}, "
                       "Interruption.HARD_TIMEOUT on ranks={1}")
    assert describe_fault([frozen]) == "rank 1 was terminated after resilience.hard_timeout_s (frozen)"
    killed = FaultNote(rank=0, at=1.0, raised="", nvrx="", lost=[2])
    assert describe_fault([killed]).startswith("rank 2 was lost (its process ended")


def test_several_ranks_are_ordered_by_how_telling_their_fault_is():
    notes = [FaultNote(rank=0, at=1.0, raised="ValueError: bad batch",
                       nvrx="Interruption.EXCEPTION on ranks={0}, Interruption.UNRESPONSIVE on ranks={3}")]
    assert describe_fault(notes) == ("rank 3 stopped answering (no heartbeat for "
                                     "resilience.heartbeat_timeout_s); rank 0 raised ValueError: bad batch")


def test_with_no_record_at_all_the_line_still_says_a_rank_failed():
    assert describe_fault([FaultNote(rank=0, at=1.0, raised="", nvrx="")]) == "a rank failed"
