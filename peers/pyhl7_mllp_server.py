"""Persistent-connection MLLP ACK server (python-hl7's asyncio MLLP support), copied from the
verified peer recipe. usage: python3 pyhl7_mllp_server.py [port] [logdir|-]
Binds 127.0.0.1 only. Each received message is appended byte for byte to
<logdir>/received.hl7, followed by the two bytes 0x1C 0x0A as a separator (0x1C never occurs
inside an MLLP payload), so tests can compare what arrived with what was sent; with "-"
nothing is written, which is how the benchmark uses it as a reference server that stores
nothing."""
import asyncio, os, sys
import hl7, hl7.mllp

port = int(sys.argv[1]) if len(sys.argv) > 1 else 2576
logdir = sys.argv[2] if len(sys.argv) > 2 else "."

async def handle(reader, writer):
    try:
        while not writer.is_closing():
            block = await reader.readblock()          # the raw MLLP payload
            if logdir != "-":
                with open(os.path.join(logdir, "received.hl7"), "ab") as f:
                    f.write(block + b"\x1c\n")
            msg = hl7.parse(block.decode(reader.encoding, reader.encoding_errors))
            writer.writemessage(msg.create_ack("AA"))
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()

async def main():
    async with await hl7.mllp.start_hl7_server(handle, host="127.0.0.1", port=port) as srv:
        print(f"python-hl7 MLLP server on 127.0.0.1:{port}", flush=True)
        await srv.serve_forever()

asyncio.run(main())
