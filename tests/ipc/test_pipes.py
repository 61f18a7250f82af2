"""`PipeReader`: the messages `Connection.send_bytes` wrote, whole and in order, without blocking."""

from __future__ import annotations

import multiprocessing
import os
import struct
import threading

from cronnx.ipc.pipes import PipeReader


def test_messages_come_whole_and_in_order_however_the_bytes_arrive():
    read_end, write_end = multiprocessing.Pipe(duplex=False)
    reader = PipeReader(read_end)
    assert reader.read() == [] and not reader.at_eof  # nothing yet: no blocking
    write_end.send_bytes(b"one")
    write_end.send_bytes(b"")
    write_end.send_bytes(b"three")
    assert reader.read() == [b"one", b"", b"three"]
    # A message cut anywhere (a writer between two writes) waits for its rest.
    frame = struct.pack("!i", 5) + b"fives"
    for cut in range(1, len(frame)):
        os.write(write_end.fileno(), frame[:cut])
        assert reader.read() == []
        os.write(write_end.fileno(), frame[cut:])
        assert reader.read() == [b"fives"]
    # The long form multiprocessing uses from 2 GiB on: -1, then an 8-byte length.
    os.write(write_end.fileno(), struct.pack("!i", -1) + struct.pack("!Q", 4) + b"long")
    assert reader.read() == [b"long"]
    write_end.close()
    assert reader.read() == [] and reader.at_eof  # a read that finds nothing finds the end


def test_a_message_larger_than_one_read_and_the_pipe_comes_whole():
    read_end, write_end = multiprocessing.Pipe(duplex=False)
    reader = PipeReader(read_end)
    big = os.urandom(3 * 1024 * 1024 + 7)  # more than the pipe holds and than one read takes
    writer = threading.Thread(target=lambda: (write_end.send_bytes(big), write_end.send_bytes(b"after"),
                                              write_end.close()))
    writer.start()
    got = []
    while not reader.at_eof:
        got += reader.read()
    writer.join()
    assert got == [big, b"after"]


def test_a_message_left_unfinished_by_a_writer_that_died_is_dropped_at_eof():
    read_end, write_end = multiprocessing.Pipe(duplex=False)
    reader = PipeReader(read_end)
    write_end.send_bytes(b"whole")
    os.write(write_end.fileno(), struct.pack("!i", 100) + b"part")
    write_end.close()
    got = reader.read()
    while not reader.at_eof:  # the event loop calls again: a closed pipe stays readable
        got += reader.read()
    assert got == [b"whole"]
