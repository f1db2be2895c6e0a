"""The large-frame DDS profile is set only where the user chose nothing, and the node's log line
says what the profile file really sets (read from it, not restated)."""

from __future__ import annotations

from vlm_ros.ros import transport


def test_the_profile_is_set_only_where_nothing_else_is():
    env: dict[str, str] = {}
    line = transport.use_large_frame_profile(env)
    assert env[transport.PROFILE_VARIABLE] == str(transport.profile_path())
    assert "64 MB shared memory" in line and "1 s for a service reply" in line
    mine = {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"}
    assert "the user's FASTDDS_BUILTIN_TRANSPORTS" in transport.use_large_frame_profile(mine)
    assert transport.PROFILE_VARIABLE not in mine
    other = {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert "rmw_cyclonedds_cpp's own settings" in transport.use_large_frame_profile(other)
    assert transport.PROFILE_VARIABLE not in other


def test_the_log_says_what_the_file_says(tmp_path):
    """An edited profile (a bigger segment, a longer reply wait) is reported as edited; a broken
    one is said to be unreadable, and the node still starts."""
    text = transport.profile_path().read_text()
    edited = tmp_path / "edited.xml"
    edited.write_text(
        text.replace("<segment_size>67108864<", "<segment_size>134217728<").replace(
            "<sec>1</sec>\n          <nanosec>0</nanosec>",
            "<sec>2</sec>\n          <nanosec>500000000</nanosec>",
        )
    )
    summary = transport.profile_summary(edited)
    assert summary == "128 MB shared memory for camera frames, 2.5 s for a service reply to match"
    broken = tmp_path / "broken.xml"
    broken.write_text(text[: len(text) // 2])
    assert transport.profile_summary(broken).startswith("unreadable: ")
