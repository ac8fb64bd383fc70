"""The edge: an aiohttp app that speaks OpenAI REST and forwards to the core over gRPC.

It translates and never decides: keys, money and limits are checked in the core. It imports
only the generated stubs (`corvex.v1`) and the shared helpers of `corvex`, never core code.
"""
